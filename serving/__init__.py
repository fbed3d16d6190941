"""Cascade serving on Ray Serve: a small and a large moe model behind an OpenAI-compatible router.

`serving.app` builds the application (`python -m moe.serve`), `serving.deploy`
builds it for Ray Serve config files (`serve run`, `serve deploy`, KubeRay),
`serving.tier` is a tier deployment, `serving.ingress` the HTTP ingress,
`serving.schema` the wire format and `serving.modes` the routing modes named
by `model`.
"""
