"""Any registered reward as an HTTP service (``python -m fastcps.rewards.serve``) and its wire format;
the trainer's client is the ``remote`` reward (``fastcps.rewards.remote``)."""
