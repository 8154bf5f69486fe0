"""The coordinator's operator tooling (not the ServerApp): ``provision`` (CA, certificates, kits from the
sites' public keys), ``deploy`` (kits, starting the SuperLink and SuperNodes), ``processes`` (Flower's
processes and the app bundle), ``simulation`` (``newadj simulate``) and ``submit`` (``newadj run``)."""
