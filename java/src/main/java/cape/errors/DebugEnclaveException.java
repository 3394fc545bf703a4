package cape.errors;

/**
 * The document comes from an enclave in debug mode (PCR0 is all zeros).
 */
public class DebugEnclaveException extends VerificationException {
    private static final long serialVersionUID = 1L;

    public DebugEnclaveException(String message) {
        super(message);
    }
}
