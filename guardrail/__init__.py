"""guardrail: a deploy gate that measures, patches and proves the safety of fine-tuned LLMs.

The library is organised one module per concept:

* :mod:`guardrail.policy` — the YAML policy;
* :mod:`guardrail.loading` — loading models safely, with digests;
* :mod:`guardrail.probes` — harmful and benign probe sets;
* :mod:`guardrail.generation` — deterministic batched generation;
* :mod:`guardrail.judging` — refusal judges;
* :mod:`guardrail.evaluation` — figures and threshold checks;
* :mod:`guardrail.realignment` — the one-shot safety patch;
* :mod:`guardrail.verification` — proof that a patch worked;
* :mod:`guardrail.registry` — the model registry;
* :mod:`guardrail.audit` — audit records and lineage;
* :mod:`guardrail.gate` — the gate that ties them together.
"""

__version__ = "0.1.0"
