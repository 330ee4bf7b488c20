"""What the model store holds, verified: a version's bundle of fitted steps checked before anything is read
(``bundle.py``), and which loaded version serves, following what TF Serving serves (``versions.py``)."""
