"""Universal adapters: one AV/AR trunk for many base models (docs/design.md §9).

For a model M of width ``d_M`` two linear maps are all that is model-specific:

* ``enc_M: d_M → d_shared``, least squares from M's activations to the anchor's on the same
  passages (:mod:`nla.universal.fit`);
* ``dec_M: d_shared → d_M``, least squares from the AR's *actual* round-trip predictions to M's
  own activations (never the inverse of ``enc_M``: that optimises the wrong objective).

The stages: ``nla universal extract`` (:mod:`nla.universal.extract`, several models on the same
passages), ``fit-enc``, ``train`` (the ordinary SFT trainer on enc-mapped, tagged rows),
``fit-dec``, ``eval`` and ``add-model`` (:mod:`nla.universal.cli`). Bundles use the layout of
:class:`nla.universal.bundle.UniversalNLA`: ``adapters/<tag>/{enc,dec}.safetensors`` plus
``extra.universal`` in ``nla_meta.yaml``.
"""

from nla.universal.fit import FitResult, fit_linear

__all__ = ["FitResult", "fit_linear"]
