"""Training stages: warm-start SFT of AV and AR (:mod:`nla.train.sft`), shared loop helpers
(:mod:`nla.train.loop`), and the ``nla train`` command (:mod:`nla.train.cli`)."""
