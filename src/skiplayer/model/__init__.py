from skiplayer.model.kv_cache import KVCache
from skiplayer.model.llama import ModelArgs, Transformer
from skiplayer.model.load import LoadedModel, load_model, resolve_model_path

__all__ = ["KVCache", "ModelArgs", "Transformer", "LoadedModel", "load_model", "resolve_model_path"]
