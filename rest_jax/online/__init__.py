"""On-policy baselines on ReST's machinery: online GRPO and semi-online ReST (``loop``), and the
samples / FLOPs every algorithm's summary rows count (``cost``)."""
