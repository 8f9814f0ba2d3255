"""flowsession: the generated gRPC stubs (flowsession.v1) and a small client facade (flowsession.client)."""
