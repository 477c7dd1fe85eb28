"""Development stand-ins that speak real protocols on real sockets: a test IdP, a Workload API issuer."""
