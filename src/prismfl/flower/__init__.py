"""prismfl on Flower: a ServerApp and a ClientApp that move prismfl's wire messages between machines.

Install with the `flower` extra (`pip install -e '.[flower]'`); docs/deploy.md walks from a laptop
simulation to several machines with TLS. The apps are adapters only: the ServerApp is a transport
for the one round loop (fl.engine) and the ClientApp calls the client side of the method
(fl.methods), exactly as the in-process simulator does.
"""
