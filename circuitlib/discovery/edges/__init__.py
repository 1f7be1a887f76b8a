"""Edge Pruning: `graph` (the edge graph and the masked forward pass), `train` (gates, training,
read-off, standalone models, results as data)."""
