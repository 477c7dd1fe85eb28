"""OAuth 2.0 Token Exchange (RFC 8693) on behalf of the caller, authenticated with the SVID."""
