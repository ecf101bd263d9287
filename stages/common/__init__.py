"""Helpers shared by the stages: params schema, artifact I/O and manifests, tracking, runtime facts."""
