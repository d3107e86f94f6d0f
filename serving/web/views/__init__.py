"""The web app's blueprints (``serving/web/app.py:create_app`` registers them all):

- ``pages``: the form, generate, regenerate, the permalink and downloads (:mod:`.pages`);
- ``card``: the served version's model card and its sample grid (:mod:`.card`);
- ``health``: ``/healthz`` (:mod:`.health`);
- ``site``: what every response shares: the request deadline, security headers, error pages (:mod:`.site`);
- ``study``: the reader study (``serving/web/study.py``).
"""
