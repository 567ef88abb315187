"""Sizing a run before it starts: its programs compiled for a TPU slice ahead of time
(:mod:`.programs`, :mod:`.report`), the chips' constants (:mod:`.chips`) and the arithmetic
memory / step-time planner (:mod:`.plan`). May import the rest of the package; nothing imports it
but the ``dirl_jax.compile_check`` command and scripts."""
