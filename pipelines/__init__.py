"""Adapters that run the guardrail gate inside workflow engines (Prefect 3, Kubeflow Pipelines v2).

The subpackages are named after the engines they wrap. Import them by their
full names (``pipelines.prefect``, ``pipelines.kfp``): with absolute imports,
``import prefect`` and ``import kfp`` still resolve to the installed engines.
Do not put the ``pipelines/`` folder itself on ``sys.path``, because then its
``prefect`` and ``kfp`` folders would shadow those packages.
"""
