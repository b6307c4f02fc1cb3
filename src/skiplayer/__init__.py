"""skiplayer: lossless self-speculative decoding (LayerSkip) with dynamic early exit.

    import skiplayer
    loaded = skiplayer.load_model("smollm2-135m", dtype="auto")   # the CLI's defaults (float16 activations)
    draft = skiplayer.resolve_draft(None, loaded)                  # its built-in calibrated draft (exit layer 4)
    result = skiplayer.generate(loaded, "Write a haiku about layers.", draft=draft, exit_layer=4,
                                generation_strategy="self_speculative", draft_source="both",
                                dynamic_early_exit_mode="adaptive", num_speculations=2, max_steps=64)
    print(result.text, result.stats.acceptance_rate)
"""
from skiplayer.decoding.generate import GenerationConfig, GenerationResult, generate, generate_ids
from skiplayer.decoding.sampling import SamplingConfig
from skiplayer.draft_artifact import load_draft, resolve_draft
from skiplayer.errors import UserError
from skiplayer.model.load import DEFAULT_MODEL, LoadedModel, load_model
from skiplayer.policies import PolicyConfig

__version__ = "0.1.0"
__all__ = ["load_model", "generate", "generate_ids", "GenerationConfig", "GenerationResult", "SamplingConfig",
           "PolicyConfig", "LoadedModel", "UserError", "DEFAULT_MODEL", "load_draft", "resolve_draft"]
