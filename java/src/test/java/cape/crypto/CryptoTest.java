package cape.crypto;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import cape.errors.DecryptionException;
import cape.errors.KeyFormatException;
import cape.errors.MalformedEnvelopeException;
import java.nio.charset.StandardCharsets;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.interfaces.RSAPublicKey;
import java.security.spec.MGF1ParameterSpec;
import java.util.Arrays;
import java.util.Base64;
import java.util.HexFormat;
import javax.crypto.Cipher;
import javax.crypto.spec.GCMParameterSpec;
import javax.crypto.spec.OAEPParameterSpec;
import javax.crypto.spec.PSource;
import javax.crypto.spec.SecretKeySpec;
import org.bouncycastle.crypto.params.X25519PrivateKeyParameters;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/** The envelope's layout and the result channel's refusals (cross-language: the live tests). */
class CryptoTest {
    private static KeyPair rsa;

    @BeforeAll
    static void key() throws Exception {
        KeyPairGenerator generator = KeyPairGenerator.getInstance("RSA");
        generator.initialize(4096);
        rsa = generator.generateKeyPair();
    }

    /** Open an envelope with the JDK alone, exactly as the layout says. */
    private static byte[] open(byte[] raw) throws Exception {
        Cipher oaep = Cipher.getInstance("RSA/ECB/OAEPPadding");
        oaep.init(Cipher.DECRYPT_MODE, rsa.getPrivate(), new OAEPParameterSpec(
                "SHA-256", "MGF1", MGF1ParameterSpec.SHA256, PSource.PSpecified.DEFAULT));
        byte[] dek = oaep.doFinal(Arrays.copyOfRange(raw, 0, 512));
        assertEquals(32, dek.length);
        Cipher gcm = Cipher.getInstance("AES/GCM/NoPadding");
        gcm.init(Cipher.DECRYPT_MODE, new SecretKeySpec(dek, "AES"),
                new GCMParameterSpec(128, Arrays.copyOfRange(raw, 512, 524)));
        return gcm.doFinal(raw, 524, raw.length - 524);
    }

    @Test
    void envelopeLayoutIsCapes() throws Exception {
        RSAPublicKey key = (RSAPublicKey) rsa.getPublic();
        byte[] raw = Envelope.seal("hello".getBytes(StandardCharsets.US_ASCII), key);
        assertEquals(545, raw.length); // 512 + 12 + 5 + 16, as protocol.md says
        assertEquals("hello", new String(open(raw), StandardCharsets.US_ASCII));

        byte[] binary = Envelope.encrypt(new byte[0], key);
        assertEquals("cape:", new String(binary, 0, 5, StandardCharsets.US_ASCII));
        assertEquals(0, open(Arrays.copyOfRange(binary, 5, binary.length)).length);

        byte[] text = Envelope.encryptText("x".getBytes(StandardCharsets.US_ASCII), key);
        String form = new String(text, StandardCharsets.US_ASCII);
        assertTrue(form.startsWith("cape:"));
        assertEquals("x", new String(open(Base64.getDecoder().decode(form.substring(5))), StandardCharsets.US_ASCII));
    }

    @Test
    void envelopesAreFreshEachTime() {
        RSAPublicKey key = (RSAPublicKey) rsa.getPublic();
        byte[] a = Envelope.seal(new byte[16], key);
        byte[] b = Envelope.seal(new byte[16], key);
        assertTrue(!Arrays.equals(Arrays.copyOfRange(a, 512, 524), Arrays.copyOfRange(b, 512, 524)));
    }

    @Test
    void smallOrForeignKeysAreRefused() throws Exception {
        KeyPairGenerator small = KeyPairGenerator.getInstance("RSA");
        small.initialize(1024);
        KeyFormatException tooSmall = assertThrows(KeyFormatException.class,
                () -> Envelope.loadPublicKey(small.generateKeyPair().getPublic().getEncoded()));
        assertTrue(tooSmall.getMessage().contains("at least 2048 bits"));
        KeyFormatException ec = assertThrows(KeyFormatException.class, () -> Envelope.loadPublicKey(
                KeyPairGenerator.getInstance("EC").generateKeyPair().getPublic().getEncoded()));
        assertTrue(ec.getMessage().contains("expected an RSA public key"));
        KeyFormatException junk = assertThrows(KeyFormatException.class, () -> Envelope.loadPublicKey(new byte[300]));
        assertTrue(junk.getMessage().contains("not a valid DER"));
    }

    @Test
    void resultChannelOpensOnlyItsOwnReplyNumberAndKind() {
        X25519PrivateKeyParameters enclave = new X25519PrivateKeyParameters(new java.security.SecureRandom());
        X25519PrivateKeyParameters response = ResultChannel.responseKey();
        ResultChannel client = ResultChannel.forClient(response, enclave.generatePublicKey().getEncoded());
        byte[] sealed = client.seal(3, "out".getBytes(StandardCharsets.US_ASCII), ResultChannel.RESULT);
        assertArrayEquals("out".getBytes(StandardCharsets.US_ASCII), client.open(3, sealed, ResultChannel.RESULT));
        assertEquals(ResultChannel.DECRYPTION_FAILED,
                assertThrows(DecryptionException.class, () -> client.open(2, sealed, ResultChannel.RESULT)).getMessage());
        assertThrows(DecryptionException.class, () -> client.open(3, sealed, ResultChannel.ERROR));
        ResultChannel other = ResultChannel.forClient(ResultChannel.responseKey(), enclave.generatePublicKey().getEncoded());
        assertThrows(DecryptionException.class, () -> other.open(3, sealed, ResultChannel.RESULT));
        assertThrows(MalformedEnvelopeException.class, () -> client.open(0, new byte[15], ResultChannel.RESULT));
    }

    @Test
    void unusableSessionKeysAreRefused() {
        assertThrows(KeyFormatException.class, () -> ResultChannel.forClient(ResultChannel.responseKey(), new byte[31]));
        assertThrows(KeyFormatException.class, () -> ResultChannel.forClient(ResultChannel.responseKey(), new byte[32]));
        assertThrows(KeyFormatException.class, () -> Hpke.seal(new byte[32], new byte[1]));
        assertTrue(assertThrows(KeyFormatException.class, () -> Hpke.seal(new byte[300], new byte[1]))
                .getMessage().contains("32 bytes, not 300"));
    }

    @Test
    void hpkeFramesAreEncPlusCiphertextAndFresh() {
        byte[] recipient = ResultChannel.responseKey().generatePublicKey().getEncoded();
        byte[] a = Hpke.seal(recipient, "input".getBytes(StandardCharsets.US_ASCII));
        byte[] b = Hpke.seal(recipient, "input".getBytes(StandardCharsets.US_ASCII));
        assertEquals(32 + 5 + 16, a.length);
        assertTrue(!Arrays.equals(a, b));
    }

    /**
     * RFC 9180 Appendix A.2.1 (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, base
     * mode), sequence number 0, taken from {@code cryptography_vectors/HPKE/test-vectors.json} in
     * PyPI's cryptography_vectors 48.0.0 (file SHA-256 61fc662f01996cd06d713dacf5e133167bd309a1f329442d53f1e21a47b3ede6),
     * the CFRG's published vectors for the RFC.
     */
    @Test
    void hpkeMatchesRfc9180Vector() {
        byte[] skEm = HexFormat.of().parseHex("f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600");
        byte[] pkRm = HexFormat.of().parseHex("4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a");
        byte[] info = HexFormat.of().parseHex("4f6465206f6e2061204772656369616e2055726e");
        byte[] aad = HexFormat.of().parseHex("436f756e742d30");
        byte[] pt = HexFormat.of().parseHex("4265617574792069732074727574682c20747275746820626561757479");
        byte[] enc = HexFormat.of().parseHex("1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a");
        byte[] ct = HexFormat.of().parseHex(
                "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28");
        byte[] sealed = Hpke.seal(pkRm, pt, new X25519PrivateKeyParameters(skEm, 0), info, aad);
        assertArrayEquals(Hpke.concat(enc, ct), sealed);
    }
}
