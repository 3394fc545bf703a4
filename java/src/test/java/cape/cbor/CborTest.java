package cape.cbor;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import cape.errors.FormatException;
import java.math.BigInteger;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.CsvSource;

/** The strict CBOR reader against RFC 8949 Appendix A vectors, and what it must refuse. */
class CborTest {
    private static Object decode(String hex) {
        return Cbor.decode(HexFormat.of().parseHex(hex), "test item");
    }

    @ParameterizedTest
    @CsvSource({
        "00, 0", "01, 1", "0a, 10", "17, 23", "1818, 24", "1819, 25", "1864, 100", "1903e8, 1000",
        "1a000f4240, 1000000", "1b000000e8d4a51000, 1000000000000", "20, -1", "29, -10",
        "3863, -100", "3903e7, -1000"
    })
    void integersDecodeAsRfc8949AppendixA(String hex, long value) {
        assertEquals(value, decode(hex));
    }

    @Test
    void bigIntegersBeyondLongAreBigIntegers() {
        assertEquals(new BigInteger("18446744073709551615"), decode("1bffffffffffffffff"));
        assertEquals(new BigInteger("-18446744073709551616"), decode("3bffffffffffffffff"));
    }

    @Test
    void stringsArraysMapsAndSimpleValues() {
        assertArrayEquals(new byte[] {1, 2, 3, 4}, (byte[]) decode("4401020304"));
        assertEquals("IETF", decode("6449455446"));
        assertEquals("\u00fc", decode("62c3bc"));
        assertEquals(List.of(1L, 2L, 3L), decode("83010203"));
        assertEquals(List.of(1L, List.of(2L, 3L), List.of(4L, 5L)), decode("8301820203820405"));
        assertEquals(Map.of(1L, 2L, 3L, 4L), decode("a201020304"));
        assertEquals(Map.of("a", 1L, "b", List.of(2L, 3L)), decode("a26161016162820203"));
        assertEquals(Boolean.FALSE, decode("f4"));
        assertEquals(Boolean.TRUE, decode("f5"));
        assertNull(decode("f6"));
        Cbor.Tagged tagged = (Cbor.Tagged) decode("d24100");
        assertEquals(18, tagged.tag());
        assertArrayEquals(new byte[] {0}, (byte[]) tagged.value());
    }

    @ParameterizedTest
    @CsvSource({
        "1817, non-minimal", "190017, non-minimal", "1a00000017, non-minimal",
        "5f42010243030405ff, indefinite", "9f0102ff, indefinite", "bf6161f5ff, indefinite",
        "a201020103, duplicate", "a2616101616102, duplicate", "0000, trailing",
        "f97c00, floating", "fb3ff199999999999a, floating", "f0, simple value", "f7, simple value",
        "1a0001, end of data", "44010203, runs past", "62c328, UTF-8", "1c, reserved",
        "a1810102, map keys"
    })
    void refusesWhatTwoParsersCouldReadDifferently(String hex, String why) {
        FormatException error = assertThrows(FormatException.class, () -> decode(hex));
        assertTrue(error.getMessage().contains(why), error.getMessage());
    }

    @Test
    void refusesNestingDeeperThanTheLimit() {
        String deep = "81".repeat(Cbor.MAX_DEPTH) + "00";
        decode(deep);
        FormatException error = assertThrows(FormatException.class, () -> decode("81" + deep));
        assertTrue(error.getMessage().contains("nested deeper"));
    }

    @Test
    void refusesHugeDeclaredLengthsWithoutAllocating() {
        assertThrows(FormatException.class, () -> decode("9b7fffffffffffffff"));
        assertThrows(FormatException.class, () -> decode("5a7fffffff"));
    }

    @Test
    void encodesTheSigStructure() {
        byte[] encoded = Cbor.encodeArray("Signature1", new byte[] {(byte) 0xa1, 1, 0x38, 0x22}, new byte[0], new byte[300]);
        assertEquals("846a5369676e61747572653144a101382240590" + "12c",
                HexFormat.of().formatHex(encoded, 0, 21));
        assertEquals(List.of("Signature1"), ((List<?>) decode(HexFormat.of().formatHex(
                Cbor.encodeArray("Signature1")))));
    }
}
