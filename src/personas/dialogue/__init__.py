"""The dialogue feature: personas talking from their own seats (`chat`) and playing games (`play`)."""
