"""The built-in draft: picked up for the model it was made for, said in one line, off with --draft none, and never
used for other weights."""
import pytest

from skiplayer import draft_artifact
from skiplayer.draft_artifact import ResidualAdapter, resolve_draft, save_draft
from skiplayer.errors import UserError
from skiplayer.model.load import LoadedModel
from tests.helpers import predictable_model


@pytest.fixture()
def builtin(tmp_path, monkeypatch):
    model = predictable_model()
    monkeypatch.setattr(draft_artifact, "BUILTIN_DIR", tmp_path)
    save_draft(tmp_path / "tiny", {2: ResidualAdapter(model.args.dim, 4)}, None,
               {"fingerprint": "abc123", "dtype": "float32"})
    return model


def test_builtin_draft_is_used_for_its_model_and_said_once(builtin):
    said = []
    draft = resolve_draft(None, LoadedModel(builtin, None, "tiny", "tiny", [2], "abc123"), said.append)
    assert draft is not None and draft.exit_layers == [2]
    assert len(said) == 1 and "built-in draft" in said[0] and "--draft none" in said[0]


def test_draft_none_turns_it_off(builtin):
    said = []
    assert resolve_draft("none", LoadedModel(builtin, None, "tiny", "tiny", [2], "abc123"), said.append) is None
    assert said == []


def test_builtin_draft_is_not_used_for_other_weights(builtin):
    said = []
    assert resolve_draft(None, LoadedModel(builtin, None, "tiny", "tiny", [2], "other"), said.append) is None
    assert len(said) == 1 and "not used" in said[0]
    # an explicit draft for other weights is still refused with a one-line error
    with pytest.raises(UserError, match="recalibrate"):
        resolve_draft(str(draft_artifact.BUILTIN_DIR / "tiny"), LoadedModel(builtin, None, "tiny", "tiny", [2],
                                                                               "other"))


def test_models_without_a_builtin_draft_get_none(builtin):
    said = []
    assert resolve_draft(None, LoadedModel(builtin, None, "some/model", "x", [2], "abc123"), said.append) is None
    assert said == []


def test_python_api_generates_with_the_builtin_draft(builtin):
    """The README's Python example: skiplayer.resolve_draft(None, loaded) then generate(..., draft=draft)."""
    import skiplayer
    from tests.helpers import FakeTokenizer
    loaded = LoadedModel(builtin, FakeTokenizer(), "tiny", "tiny", [2], "abc123")
    draft = skiplayer.resolve_draft(None, loaded, lambda line: None)
    ids, _, stats = skiplayer.generate_ids(builtin, [1, 5, 7], skiplayer.GenerationConfig(
        max_steps=12, generation_strategy="self_speculative",
        policy=skiplayer.PolicyConfig(exit_layer=2, num_speculations=2, draft_source="both")), draft=draft)
    plain, _, _ = skiplayer.generate_ids(builtin, [1, 5, 7], skiplayer.GenerationConfig(max_steps=12))
    assert draft is not None and ids == plain and stats.rounds > 0
