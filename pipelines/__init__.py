"""The data plane: WebDataset shards -> Ray Data -> clean shards or training batches."""
