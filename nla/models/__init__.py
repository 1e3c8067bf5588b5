"""Model loading, layer access, injection, verbalizer and reconstructor."""

from nla.models.layers import decoder_blocks, default_layer, hidden_size, num_layers
from nla.models.loading import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_path

__all__ = [
    "DEFAULT_MODEL",
    "decoder_blocks",
    "default_layer",
    "hidden_size",
    "load_model",
    "load_tokenizer",
    "num_layers",
    "resolve_model_path",
]
