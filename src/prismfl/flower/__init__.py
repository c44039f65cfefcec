"""prismfl on Flower: a ServerApp and a ClientApp that move prismfl's wire messages between machines.

Install with the `flower` extra (`pip install -e '.[flower]'`); docs/deploy.md walks from a laptop
simulation to several machines with TLS. The apps are adapters only: the algorithm is fl.task,
fl.client, fl.protocol and fl.simulate's round records, exactly as the in-process simulator runs it.
"""
