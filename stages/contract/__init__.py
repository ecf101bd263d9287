"""The stage contract: params, registry, execute, manifests, currency, code deps, tracking, device, isolation."""
