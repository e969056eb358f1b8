"""FX rewrites on the Dynamo graph (linear and SDPA -> scalesearch ops)."""
