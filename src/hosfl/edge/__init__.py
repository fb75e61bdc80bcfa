"""Real edge clients: what ``hosfl client`` (one client, on its own device) and the server's
network engine (``engines/net.py``) share: the frame around each message (``wire``) and the
credentials (``keys``). The client side imports no Ray, no matplotlib, nothing of the server.
"""
