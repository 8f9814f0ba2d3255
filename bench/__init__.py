"""`make bench`: load benchmark of the flowsession server against a bare grpc.aio server.

Run ``python -m bench`` (``--quick`` for a ~1 minute smoke run). See bench/__main__.py.
"""
