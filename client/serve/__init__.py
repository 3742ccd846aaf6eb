"""A site's use of its model: ``fedretrain site serve`` (an OpenAI-style completions service on
the installed version) and feedback on its answers (``fedretrain site feedback``), kept at the site.

- :mod:`~client.serve.journal`  requests.jsonl and feedback.jsonl, and each version's live score
- :mod:`~client.serve.feedback` a rating, or a correction ingested as a training record
- :mod:`~client.serve.app`      the FastAPI routes and the model they share
"""
