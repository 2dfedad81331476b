"""Reading chest X-rays: the project's single image reader (:mod:`covidxr.images.reader`), DICOM decoding and
the pixel conventions they share."""
