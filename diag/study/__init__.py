"""The all-pairs study: running it (sharded, resumable, in workers), its summaries and
Table 1, the method report, noise ceilings, the Kernel SHAP budget and the figures."""
