"""Stage gradcam: Grad-CAM maps, their localisation and randomisation checks, the HTML report."""
