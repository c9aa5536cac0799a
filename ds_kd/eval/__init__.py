"""Evaluation: the fine-tuning grid (``grid``), sentence retrieval (``retrieval``), latency and throughput
(``speed``), the report and its tables (``report``), the paper's findings checked against ours (``findings``)
and the paper's own figures (``paper_results``)."""
