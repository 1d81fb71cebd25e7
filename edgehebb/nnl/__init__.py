"""Stage 2 of the pipeline: freeze learned filter banks into NNL-CONV networks and train their heads.

- :mod:`~edgehebb.nnl.spec`: architectures as data (:class:`BlockSpec`, :class:`NetSpec`), read from JSON;
- :mod:`~edgehebb.nnl.layers`: the NNL-CONV layer (patch norm, cosine, ReLU^n, max-pool), the networks
  and their standard-CONV twins;
- :mod:`~edgehebb.nnl.model`: model directories (``config.json`` + ``model.safetensors``, described in
  ``models/MODEL_FORMAT.md``);
- :mod:`~edgehebb.nnl.features`: frozen features, computed once and cached;
- :mod:`~edgehebb.nnl.train`: the head on frozen features, the CONV twin end to end, ``edgehebb train``.

The names below are the stage's public API; ``from edgehebb.nnl import NNLNet, load_spec`` is the way in.
"""

from edgehebb.nnl.layers import EPS, ConvBlock, ConvNet, HiddenHead, Net, NNLConv, NNLNet, colour_normalise
from edgehebb.nnl.model import load_model, resolve_model, save_model, shipped_models
from edgehebb.nnl.spec import (COLOUR_NORMS, BlockSpec, NetSpec, available_specs, feature_dim, load_spec,
                               spec_from_dict, with_options)

__all__ = ["COLOUR_NORMS", "EPS", "BlockSpec", "ConvBlock", "ConvNet", "HiddenHead", "Net", "NetSpec", "NNLConv", "NNLNet",
           "available_specs", "colour_normalise", "feature_dim", "load_model", "load_spec", "resolve_model",
           "save_model", "shipped_models", "spec_from_dict", "with_options"]
