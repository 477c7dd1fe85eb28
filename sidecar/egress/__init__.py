"""Egress control: the allowlist policy, the iptables capture rules, the 15001 enforcer, explicit proxy."""
