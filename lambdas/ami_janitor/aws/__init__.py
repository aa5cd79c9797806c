"""The AWS edge: clients, the region inventory, the executor, and the writes of rotation, shares,
copies and bakes. The only layer that calls AWS."""
