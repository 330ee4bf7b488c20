"""What the fitted scikit-learn steps are, as plain arrays read without unpickling (``fitted.py``), and
the numpy kernels that compute them with proved parity to scikit-learn (``kernels.py``). No protocol here."""
