"""The Redis side: connections, the subscription, the commands sent, Redis' clock."""
