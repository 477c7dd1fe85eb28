"""Outrider's admission side: the AdmissionReview server, the injection engine and its tooling.

The distribution is `outrider`; `outrider.webhook.cli:main` is the `outrider` console script.
"""

__version__ = "0.1.0"
