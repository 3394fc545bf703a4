package cape.errors;

/**
 * No usable attestation root is pinned, or a fetched root has another fingerprint.
 */
public class UntrustedRootException extends VerificationException {
    private static final long serialVersionUID = 1L;

    public UntrustedRootException(String message) {
        super(message);
    }
}
