package cape.errors;

import java.util.HexFormat;
import java.util.List;
import java.util.stream.Collectors;

/** A PCR is absent or holds a value outside the caller's allow-list. */
public class PcrMismatchException extends VerificationException {
    private static final long serialVersionUID = 1L;

    private final int index;
    private final transient List<byte[]> expected;
    private final byte[] actual;

    public PcrMismatchException(int index, List<byte[]> expected, byte[] actual) {
        super(message(index, expected, actual));
        this.index = index;
        this.expected = List.copyOf(expected);
        this.actual = actual == null ? null : actual.clone();
    }

    private static String message(int index, List<byte[]> expected, byte[] actual) {
        HexFormat hex = HexFormat.of();
        String got = actual == null ? "absent" : hex.formatHex(actual);
        String allowed = expected.stream().map(hex::formatHex).sorted().collect(Collectors.joining(", "));
        return "PCR" + index + " is " + got + "; allowed: " + (allowed.isEmpty() ? "nothing" : allowed);
    }

    public int index() {
        return index;
    }

    public List<byte[]> expected() {
        return expected;
    }

    /** The document's value, or {@code null} when the PCR is absent. */
    public byte[] actual() {
        return actual == null ? null : actual.clone();
    }
}
