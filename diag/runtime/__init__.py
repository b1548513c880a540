"""How diag runs: the workspace of one invocation (store, preset, zoo, models), torch.distributed
helpers, the work split over ranks and the local worker processes of ``--workers``."""
