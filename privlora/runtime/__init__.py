"""Runtime: client, server, transport and the generation loop."""
