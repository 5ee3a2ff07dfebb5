"""The RunPod serverless worker: `python -m runners.worker` (README, "RunPod serverless worker").

handler: the jobs; schema: the request and the error contract; images: input images, fetched and
decoded defensively; outputs: where a job's images go; storage: S3-compatible stores.
"""
