package cape.errors;

/**
 * Key bytes that are not a usable key of the expected kind.
 */
public class KeyFormatException extends FormatException {
    private static final long serialVersionUID = 1L;

    public KeyFormatException(String message) {
        super(message);
    }
}
