"""gRPC layer: servicers, proto <-> domain conversion, error mapping and server bootstrap."""
