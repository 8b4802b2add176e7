"""The exchange layer: market data (``markets``, no ccxt import) and the ccxt clients
(``exchanges``). The domain never imports ccxt; it gets instrument data from here."""
