"""The federated round without Flower: the aggregator (`aggregator`), the server-side methods it
plugs in (`server_methods`), the node registry (`nodes`), the server model (`server_model`) and the
client's local round (`local`). `server/` and `client/` only translate these to Flower messages."""
