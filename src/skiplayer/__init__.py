"""skiplayer: lossless self-speculative decoding (LayerSkip) with dynamic early exit.

    import skiplayer
    loaded = skiplayer.load_model("smollm2-135m")
    result = skiplayer.generate(loaded, "Write a haiku about layers.", generation_strategy="self_speculative",
                                exit_layer=8, num_speculations=4, max_steps=64)
    print(result.text, result.stats.acceptance_rate)
"""
from skiplayer.decoding.generate import GenerationConfig, GenerationResult, generate, generate_ids
from skiplayer.decoding.sampling import SamplingConfig
from skiplayer.errors import UserError
from skiplayer.model.load import DEFAULT_MODEL, LoadedModel, load_model
from skiplayer.policies import PolicyConfig

__version__ = "0.1.0"
__all__ = ["load_model", "generate", "generate_ids", "GenerationConfig", "GenerationResult", "SamplingConfig",
           "PolicyConfig", "LoadedModel", "UserError", "DEFAULT_MODEL"]
