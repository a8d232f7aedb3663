"""Tools built on the rooms below: benchmarks (``bench``), the load and fault harness
(``loadtest``), the extraction attack (``attack``), the demo, fine-tuning and evaluation on the
shipped clinic dataset (``finetune``, ``evaluate``, ``qa``)."""
