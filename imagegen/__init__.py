"""imagegen-pipeline: curated WebDataset shards -> generative model training -> evaluation.

The library holds the logic as plain functions; ``flows/`` and ``tasks/`` wrap it in Prefect.
"""

__version__ = "0.1.0"
