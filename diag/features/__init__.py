"""What is measured of a (source, target) pair before any transfer: cosines of task vectors, the
pair's features and risks (one function for the study and the ranker), the streamed features of
open-world ranking over memory-mapped files."""
